"""The HTTP / WebSocket server. Build the app with `makima_tts.server.app.create_app`."""
