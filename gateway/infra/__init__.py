"""Infrastructure beneath everything: typed configuration, the injectable clock, DNS, durable files."""
