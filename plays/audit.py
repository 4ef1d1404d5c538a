"""The audit actions of the play verbs (``tenancy.audit.ACTIONS``), by ``Play`` method name."""

PLAY_VERBS = {"hold": "play.held", "resume": "play.resumed", "cancel": "play.cancelled", "begin": "play.started"}
