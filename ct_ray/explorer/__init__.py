"""The explorer: `ct-ray serve`, a small HTTP server (JSON API over the tables + the bundled web page)."""
