"""One module per supported Hugging Face architecture; see registry.py."""
