"""OpenAI-compatible gateway in front of one or more ``mgm engine`` servers (``mgm gateway``)."""
