"""Configuration database: models (`models`), engine/sessions (`engine`), migrations (`migrate`)."""
