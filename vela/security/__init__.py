"""Security core: keys, onboarding, challenges, build tokens, sealed packages."""
