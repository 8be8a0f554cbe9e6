from services.transcription.app import create_app
from services.transcription.settings import TranscriptionSettings
from shared.runner import serve

serve("transcription", TranscriptionSettings, create_app)
