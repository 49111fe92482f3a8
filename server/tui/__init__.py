"""The fleet TUI (Textual): see server/tui/app.py."""
