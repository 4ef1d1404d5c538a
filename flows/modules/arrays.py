"""`array-filter` and `array-map`."""
