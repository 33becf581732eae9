"""Adapters between kvpoll's statuses and other systems' codes."""
