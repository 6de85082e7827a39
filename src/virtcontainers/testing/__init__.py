"""Test doubles that ship with the library: VMM simulators speaking the real APIs.

They run no guest; they let the drivers' launch and control paths be exercised where the
real VMM or KVM is missing. See each module's docstring for what it simulates.
"""
