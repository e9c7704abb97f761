"""Serving a fused model over HTTP with the OpenAI API (``mtnlg serve``)."""
