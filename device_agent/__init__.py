"""The device side: session with an edge, uploader, query loop, handoff."""
