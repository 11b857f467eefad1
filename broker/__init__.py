"""The embedded MQTT broker (amqtt) and launchers for mosquitto."""
