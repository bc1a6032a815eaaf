"""The web page: sample and edit with the DiT and the VAR in a browser (Gradio; `pip install scalegen[web]`)."""
