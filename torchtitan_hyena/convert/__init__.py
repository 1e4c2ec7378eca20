"""Checkpoint converters: the library behind llama_to_dcp.py and dcp_to_llama.py."""
