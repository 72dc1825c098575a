"""Stage package; see the modules inside."""
