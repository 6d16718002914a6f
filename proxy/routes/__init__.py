"""The HTTP surface, one blueprint per protocol: routes parse, authorise and hand off."""
