"""The reference of bench/http_scaling.py: a bare FastAPI endpoint that returns one project's
JSON from memory with orjson, under one uvicorn process like an API instance.

    python -m bench.bare_endpoint --port 18070 --document project.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson
import uvicorn
from fastapi import FastAPI
from fastapi.responses import ORJSONResponse


def create_app(document: dict) -> FastAPI:
    app = FastAPI()

    @app.get("/api/v1/projects/{project_id}")
    async def read_project(project_id: str) -> ORJSONResponse:
        return ORJSONResponse(document)

    @app.get("/health")
    async def read_health() -> ORJSONResponse:
        return ORJSONResponse({"status": "ok"})

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_endpoint", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--document", type=Path, required=True, help="JSON file served for every project id")
    arguments = parser.parse_args(sys.argv[1:] if argv is None else argv)
    document = orjson.loads(arguments.document.read_bytes())
    uvicorn.run(
        create_app(document), host="127.0.0.1", port=arguments.port, log_level="warning", access_log=False
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
