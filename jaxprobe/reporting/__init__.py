"""What every study's pages are made of: one HTML page shell and style, tables, settings, embedded figures."""
