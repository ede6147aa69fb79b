"""Board: Raspberry Pi Pico W (RP2040 + CYW43439; RPI_PICO_W firmware).
Wi-Fi from "network" in microtun.json (set "country", e.g. "GB", for your
regulatory domain). The BOOTSEL button is the safe-mode button: press it
within the boot window after power-up (held *at* power-up it starts the USB
bootloader instead). The LED is on the wireless chip: Pin("LED").
"""
from machine import Pin, ADC
import rp2

NAME = "rpi_pico_w"
_PLATFORM = const("rp2")
_MACHINE_HAS = const("Pico W")
_MPY_ARCH = const("armv6m")
_CRYPTOLIB = const(True)

NETWORK = "wifi"
SAFE_BUTTON = "BOOTSEL"
WDT_MAX_MS = 8388            # the RP2040 watchdog counts at most 8.3 s
FIRMWARE = {}

_led = Pin("LED", Pin.OUT, value=0)


def _setup(wlan):
    # The CYW43's default power save adds tens of ms to incoming UDP.
    try:
        wlan.config(pm=wlan.PM_NONE)
    except (AttributeError, ValueError, OSError):
        wlan.config(pm=0xA11140)         # older firmware: the same, by number


def network_up(net, timeout_ms, feed):
    from microtun_net import wifi_connect       # shared: firmware/microtun_net.py
    return wifi_connect(net, timeout_ms, feed, _setup)


def network_ok():
    import network
    return network.WLAN(network.STA_IF).isconnected()


def safe_button():
    return rp2.bootsel_button() == 1


def led(on):
    _led.value(1 if on else 0)


def temperature():
    v = ADC(ADC.CORE_TEMP).read_u16() * 3.3 / 65535
    return round(27 - (v - 0.706) / 0.001721, 1)
