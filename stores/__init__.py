"""The built-in stores, one package each: ``outboxbind.stores.<name>``."""
