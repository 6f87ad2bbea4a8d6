"""Server- and site-side components named in job configs (persistor, selector, receivers, executor)."""
