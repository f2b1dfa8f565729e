"""The application shell: what the command lines install in the process (and the library never)."""
