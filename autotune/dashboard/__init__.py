"""Web dashboard: FastAPI pages and a JSON API over a study store (read-only, torch-free)."""

from __future__ import annotations

from autotune.dashboard.app import create_app

__all__ = ["create_app"]
