"""Tests of the process model: a supervisor and one worker process per VM."""
