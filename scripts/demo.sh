#!/usr/bin/env bash
# Install what is needed, then run an example project end to end on the embedded default
# (a SQLite file under data/, the offline model) and print its report.
# Arguments go to `python -m app.cli demo`, for example `--brief invoice-reminders`.
source "$(dirname "$0")/bootstrap.sh" ""
exec .venv/bin/python -m app.cli demo "$@"
