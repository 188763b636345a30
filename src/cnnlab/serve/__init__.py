"""Deployment: the model bundle (`cnnlab export`) and the web server (`cnnlab serve`)."""
