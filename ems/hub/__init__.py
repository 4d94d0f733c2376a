"""The EMS hub."""
