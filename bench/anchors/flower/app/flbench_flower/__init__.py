"""fl benchmark anchor: the benchmark's scenarios as a Flower App (ServerApp + ClientApp)."""
