"""Helpers shared by the test packages: live servers, engines, the mgm serve stack, SDXL workers."""
