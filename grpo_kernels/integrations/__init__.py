"""Integrations with other libraries (TRL, trainers). The core package never imports them; each imports its library
lazily, when used."""
