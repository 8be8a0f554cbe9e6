from services.transcription.app import create_app
from services.transcription.settings import TranscriptionSettings
from shared.runner import serve

if __name__ == "__main__":  # the worker processes import this package too
    serve("transcription", TranscriptionSettings, create_app)
