"""Privacy: secure aggregation (secagg.py and its parts) and differential privacy (dp.py); no gRPC here."""
