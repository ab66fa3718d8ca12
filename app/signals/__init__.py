"""Signals between processes: a task became ready, a project was cancelled, a project has new events.

They only make things faster: the database stays the record, workers still poll and event
streams still read the database, so a lost signal delays work but loses nothing.
"""

from app.signals.bus import Channel, EventFollower, SignalBus, build_signal_bus
from app.signals.relay import CommitRelay

__all__ = ["Channel", "CommitRelay", "EventFollower", "SignalBus", "build_signal_bus"]
