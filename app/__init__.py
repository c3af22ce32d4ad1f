"""Dragonfly-Med Studio, the clinician's app: page (ui), per-page sessions, session log, login, overlay."""
