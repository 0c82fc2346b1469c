"""guest_images package."""
