"""Who spoke: voiceprints from a speaker-embedding model (encoder.py), speaker turns
from them (diarize.py), and enrolled voices kept per owner."""
