"""The reaper: expires holds on time and purges old records."""
