"""The edge agent (`python -m ems.edge`): link loop, outbox, dispatcher, scheduler and sensors.

It runs on a Raspberry Pi-class device, drives `ems.protocol.DeviceSession` over one WebSocket to
the hub, and keeps everything it must not lose (outbox, history, command record) under its data
directory. `ems.edge.config` documents its settings.
"""
