"""The Gemini API (generateContent, streamGenerateContent, countTokens) over a chat upstream."""
