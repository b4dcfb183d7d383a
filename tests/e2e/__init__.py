"""
End-to-end tests: the real docker CLI and Docker SDK against real rootless
Docker daemons, through the real router.  Plain pytest functions, run by
pytest (see README, "Install and run the tests").
"""
