"""Render the shipped nginx configuration for given instances and run nginx in the foreground.

    python -m app.deployment.nginx --backends 127.0.0.1:8001,127.0.0.1:8002 --port 8080
    python -m app.deployment.nginx --backends app:8000 --port 80 --container --output deploy/nginx/nginx.conf

The template is ``deploy/nginx/nginx.conf.template``. Without ``--output`` the rendered file,
nginx's pid file, logs and temporary files go to ``--runtime-dir`` and the process replaces
itself with ``nginx -g 'daemon off;'``, so that a SIGTERM sent to it reaches nginx.
``scripts/run_nginx.sh`` installs nginx first where it is missing.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from app.core.arguments import parse_address, port_number
from app.core.config import load_settings
from app.deployment.simple_load_balancer import backend_list
from app.errors import TorontoAIError

TEMPLATE_PATH = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / "nginx.conf.template"
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
# Passive checks of open-source nginx: after this many failed attempts within FAIL_TIMEOUT an
# instance gets no requests for FAIL_TIMEOUT. nginx has no active checks or slow start
# without its commercial edition.
MAX_FAILS = 3
FAIL_TIMEOUT = "10s"


def upstream_lines(backends: list[str]) -> str:
    lines = []
    for backend in backends:
        host, port = parse_address(backend)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        lines.append(f"        server {address} max_fails={MAX_FAILS} fail_timeout={FAIL_TIMEOUT};")
    return "\n".join(lines)


def render(
    backends: list[str],
    *,
    listen: str,
    max_body_bytes: int,
    runtime_dir: Path | None,
    worker_processes: str = "auto",
    template: str | None = None,
) -> str:
    """Return the configuration text; ``runtime_dir`` None means the paths of the nginx container image."""
    if runtime_dir is None:
        paths = {
            "pid_path": "/var/run/nginx.pid",
            "error_log": "/dev/stderr",
            "access_log": "/dev/stdout",
            "temp_dir": "/var/cache/nginx",
        }
    else:
        paths = {
            "pid_path": str(runtime_dir / "nginx.pid"),
            "error_log": str(runtime_dir / "error.log"),
            "access_log": str(runtime_dir / "access.log"),
            "temp_dir": str(runtime_dir / "temp"),
        }
    values = {
        **paths,
        "worker_processes": worker_processes,
        "listen": listen,
        "client_max_body_size": str(max_body_bytes),
        "upstream_servers": upstream_lines(backends),
    }
    text = TEMPLATE_PATH.read_text(encoding="utf-8") if template is None else template

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise TorontoAIError(
                f"{TEMPLATE_PATH}: unknown placeholder {{{{{name}}}}}; accepted: {sorted(values)}"
            )
        return values[name]

    return PLACEHOLDER.sub(substitute, text)


def find_nginx() -> str:
    found = shutil.which("nginx") or next(
        (path for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(path, os.X_OK)), None
    )
    if found is None:
        raise TorontoAIError(
            "nginx is not installed; run scripts/run_nginx.sh, which installs it with apt-get, "
            "or install the nginx package"
        )
    return found


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m app.deployment.nginx",
        allow_abbrev=False,
        description=(
            "Render the nginx configuration for the given API instances and run nginx in the foreground."
        ),
    )
    parser.add_argument(
        "--backends", type=backend_list, required=True, help="comma-separated host:port entries"
    )
    parser.add_argument("--port", type=port_number, required=True, help="TCP port nginx listens on")
    parser.add_argument("--host", default="127.0.0.1", help="address nginx listens on (default: 127.0.0.1)")
    parser.add_argument(
        "--runtime-dir",
        type=Path,
        help="folder for the rendered file, logs and pid (default: a new temporary folder)",
    )
    parser.add_argument(
        "--worker-processes", default="auto", help="nginx worker processes (default: auto, one per core)"
    )
    parser.add_argument(
        "--output", type=Path, help="write the configuration to this file and exit instead of running nginx"
    )
    parser.add_argument(
        "--container",
        action="store_true",
        help="use the paths of the nginx container image and listen on all addresses (with --output)",
    )
    arguments = parser.parse_args(argv)
    if arguments.port == 0:
        parser.error("--port 0 is not allowed; give the port clients will connect to, from 1 to 65535")
    if arguments.container and arguments.output is None:
        parser.error("--container only renders a file; add --output FILE")
    return arguments


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    try:
        max_body_bytes = load_settings().api.max_body_bytes
        if arguments.container:
            text = render(
                arguments.backends,
                listen=str(arguments.port),
                max_body_bytes=max_body_bytes,
                runtime_dir=None,
                worker_processes=arguments.worker_processes,
            )
            arguments.output.write_text(text, encoding="utf-8")
            return 0

        runtime_dir = arguments.runtime_dir or Path(tempfile.mkdtemp(prefix="toronto-ai-nginx-"))
        runtime_dir = runtime_dir.resolve()
        (runtime_dir / "temp").mkdir(parents=True, exist_ok=True)
        host = f"[{arguments.host}]" if ":" in arguments.host else arguments.host
        text = render(
            arguments.backends,
            listen=f"{host}:{arguments.port}",
            max_body_bytes=max_body_bytes,
            runtime_dir=runtime_dir,
            worker_processes=arguments.worker_processes,
        )
        config_path = arguments.output or runtime_dir / "nginx.conf"
        config_path.write_text(text, encoding="utf-8")
        if arguments.output is not None:
            return 0
        nginx = find_nginx()
    except (TorontoAIError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"nginx configuration: {config_path}; logs in {runtime_dir}", file=sys.stderr, flush=True)
    os.execv(nginx, [nginx, "-p", str(runtime_dir), "-c", str(config_path), "-g", "daemon off;"])


if __name__ == "__main__":
    sys.exit(main())
