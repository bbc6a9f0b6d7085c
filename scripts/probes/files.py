"""Probe cases for files on disk: kills at random moments, concurrent readers and writers, a full
disk, read-only folders and symlinks (issue 17, items 1-4, 11, 12, 16, 17, 21, 22)."""

from __future__ import annotations
