"""
Who the client is and which daemon it may reach: credentials, the user
namespace a client runs in, rules and user database lookups, what the client
may see of a path, and the resolver with its reasons and advice.

Imports nothing of the relay or the service, and no reactor module: the
console scripts use it too.
"""
