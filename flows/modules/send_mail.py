"""`send-mail`."""
