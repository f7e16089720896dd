"""Web side of leadscore: verify CRM webhooks, normalise them, enqueue scoring."""
