"""Built-in handlers, one file per hub-to-device message type."""
