"""Queue side of leadscore: read the lead, score it, write the score back."""
