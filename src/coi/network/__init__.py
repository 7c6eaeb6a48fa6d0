"""Network isolation: the bridges and ACLs coi makes, and how they are found and removed."""
