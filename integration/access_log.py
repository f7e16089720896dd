"""Gunicorn's access log, redacted as every other log line is (`logs.redact`): the URL of a
Salesforce Outbound Message carries SALESFORCE_WEBHOOK_TOKEN, in its path or its query."""

from __future__ import annotations

from gunicorn.glogging import Logger

from integration.logs import redact

URL_ATOMS = ("r", "U", "q")  # the request line, its path, its query string


class RedactingAccessLog(Logger):
    def atoms(self, resp, req, environ, request_time) -> dict:
        atoms = super().atoms(resp, req, environ, request_time)
        for key in URL_ATOMS:
            if atoms.get(key):
                atoms[key] = redact(atoms[key])
        return atoms
