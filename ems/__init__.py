"""EMS: the real-time communication layer between IoT devices and their backend."""

__version__ = "0.1.0"
