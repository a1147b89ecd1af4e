"""The dashboard's widgets, one per module; each reads plain wire snapshots (appliance/status.py)."""
