"""``kvpoll demo``: the main job, between real processes."""

from kvpoll.demo.orchestrator import DemoError, run_demo

__all__ = ["DemoError", "run_demo"]
